"""What graceful reads: the one ``Source`` (source.py: the scenario or a user's image folder
or Parquet data), and under it data sets, the scenario's stages, sources' scans and
readers, snapshots and the streamed item order."""
