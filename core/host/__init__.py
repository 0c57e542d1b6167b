"""What the host CRM sees: events (:mod:`.events`), the webhook queue
(:mod:`.webhooks`) and its target policy (:mod:`.webhook_targets`), API keys and
idempotency records (:mod:`.apikeys`), and read models (:mod:`.views` for one
sub-account, :mod:`.reports` across all)."""
