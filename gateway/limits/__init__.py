"""limit: rate limits, token/cost budgets and loop detection, reserved before forwarding and settled after."""
