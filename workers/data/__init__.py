"""What graceful reads: data sets and the scenario, sources and their snapshots, the
streamed item order."""
