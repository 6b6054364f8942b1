"""DataModules and streams that feed prepared shards to the stages."""
