"""Planning without starting anything: rank layout, memory and FLOPs estimates."""
