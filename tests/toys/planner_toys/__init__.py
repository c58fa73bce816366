"""Four toy extensions of the planner, one module each, registered through this package's entry points
(pyproject.toml beside it) as any plug-in package's are: `objective` (a maximised accuracy objective scored
from the runtime's logits), `grid` (a storage grid: symmetric 6-bit codes), `method` (a rounding method), and
`target` (a deployment target shipping the toy grid in its own artifact format)."""
