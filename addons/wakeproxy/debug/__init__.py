"""`wakeproxy debug`: one sandbox's live traffic in mitmweb (ui: the controller's side; web: the UI process)."""
