"""The pure domain: lifecycle graph, rotation value objects, retry policy, errors. No I/O."""
