"""The variant language: its text form and policy, the pattern registry, one module per pattern
that has its own, and block layouts (the contract every sparse executor runs).
"""
