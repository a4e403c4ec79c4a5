"""Security: authentication, the consent decision, break-glass, audit, crypto."""
