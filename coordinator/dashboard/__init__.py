"""The coordinator's dashboard: one read-only page at `GET /`, live over server-sent events.

`routes.make_router` serves the page and its feed; `state.DashboardState` builds the document the
page draws; `ledger_view.LedgerView` tails the ledger for audits, slashes and earnings.
"""
