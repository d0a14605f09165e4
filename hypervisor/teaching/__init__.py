"""Teaching: graded labs, the guided demo (and the debugging and inspection tools)."""
