"""The `llm_gateway.admin.v1.AdminService` servicer: keys, teams, spend and usage. Never imported
by the data plane."""
