"""The operator's side: the admin API and pages, behind admin.token."""
