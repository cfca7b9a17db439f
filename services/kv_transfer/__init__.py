"""KV transfer service: one per region; moves prefix KV and model weights between regions.

So far it serves its identity and the configured WAN link capacities (`GetInfo`), with health,
reflection and metrics; transfers themselves are not implemented yet.
"""
