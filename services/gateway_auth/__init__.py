"""Agent authentication: certificates, enrollment and revocation."""
