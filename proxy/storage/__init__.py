"""Cache storage: the entry record, the tier contracts, memory, the tiered cache, the Volumes."""
