"""Tenancy of the data plane: key and team records, budgets and their periods, the usage ledger's
records and writer, and the in-process key cache. Shared by the store, the interceptors and the
admin service; imports none of them."""
