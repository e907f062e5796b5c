"""The optional PostgreSQL index: pool, schema, entries table, legacy table, janitor ledger."""
