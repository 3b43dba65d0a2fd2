"""Running the programs on one or many hosts: mesh and sharding, command-line glue, supervisor."""
