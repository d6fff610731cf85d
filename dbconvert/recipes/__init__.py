"""Shipped recipes (YAML). `dbconvert recipes` lists them; `dbconvert split NAME` uses one."""
