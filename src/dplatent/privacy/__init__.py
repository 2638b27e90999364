"""Privacy: accounting across stages, the ledger of private-data accesses, DP-SGD wiring."""
