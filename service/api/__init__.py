"""Servicers: validate, open one unit of work, call repositories, convert to messages."""
