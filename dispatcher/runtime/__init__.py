"""The running dispatcher: claim, gate, execute, settle. Adapters over the pure core."""
