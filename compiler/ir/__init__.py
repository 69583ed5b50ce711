"""The vocabulary every layer builds on: the attention ops, the site description, graph helpers, masks,
plan data and errors. Imports nothing else of attnforge.
"""
