"""Where decisions go, on the device only: the decision log (`decision_log`, decisions.jsonl),
the decision socket (`socket_server`), the `listen` client (`listen`), the `[actions]` table
(`table`) and its runner (`runner`); `outlets` is what the service wires. Decisions never leave
the device this way: a file, a Unix socket and local programs."""
