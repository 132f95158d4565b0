"""The HIR: ops, types, graph, verification, text forms, the reference interpreter, passes and profiles."""
