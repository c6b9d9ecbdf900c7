"""Tenancy of the data plane: key and team records, budgets and their periods, the usage ledger's
records and batching writer, and the in-process key cache. Shared by the store, the interceptors
and the admin service; the key cache and the ledger writer reach the database only through the
`store.base.Store` interface."""
