"""Cache tiers: memory, Volume, and the tiered composition."""
