"""Consumers of the outbox stream: the audit trail in PostgreSQL (and its migrations) and push."""
