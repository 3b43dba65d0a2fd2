"""The model families (Strip-MLP and its Vision-MLP relatives), their layers and the registry."""
