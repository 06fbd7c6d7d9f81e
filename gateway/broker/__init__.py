"""What feeds the hub's topics: `memory` (this process talks to the upstream) or `redis` (replicas share it)."""
