"""Provider side: hardware profile, shard runtime, sessions and (later) the libp2p node."""
