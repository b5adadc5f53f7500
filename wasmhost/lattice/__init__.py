"""The lattice: several daemons on several machines as one actor system over NATS (see README "Lattice")."""
