"""The passkey kind: end users' passkeys rotated with the user in the loop."""
