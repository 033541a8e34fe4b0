"""The tiers below the GPU block pool: pinned CPU memory, local disk, a remote store."""
