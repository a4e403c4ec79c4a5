"""Patient notifications: the transactional outbox, its worker, and the notices' outcomes."""
