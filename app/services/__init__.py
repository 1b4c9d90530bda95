"""The logic behind routes: one module per resource."""
