"""condo's built-in proxy (`:proxy`): a data plane outside condo's process (HAProxy), the
routes condo wants it to have, and the task that keeps the two equal.

`condo.routes` (pure) says what should serve each listener, from the services' states;
`haproxy` is the only code that talks to the HAProxy process (its files, its start, its admin
socket); `reconcile` is the task that makes HAProxy follow the routes.
"""
