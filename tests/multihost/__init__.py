"""Two namespaced hosts (a package, so that its shared Ray cluster is torn down when it ends)."""
