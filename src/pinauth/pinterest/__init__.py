"""Everything that speaks Pinterest's wire format: OAuth token calls and the v5 API."""
