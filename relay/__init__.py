"""Relay: one tier of a familial model per process, chained device -> edge -> cloud over gRPC.

Entry points: `relay.client.RelayClient` (for the HTTP router), `relay.cli` (node flags, `run_node`,
`start_node`), `relay.node.serve`. Protocol and invariants: docs/relay.md.
"""
