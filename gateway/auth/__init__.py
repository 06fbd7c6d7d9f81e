"""Who may watch what: `tokens` (session JWTs), `authz` (the streams claim and the webhook),
`address` (where a request comes from) and `admission` (the one path every stream goes through)."""
