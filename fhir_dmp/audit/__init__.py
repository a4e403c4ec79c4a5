"""The access journal: IHE BALP AuditEvents, appended durably, hash-chained, sealed and verified."""
