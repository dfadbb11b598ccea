"""End-to-end tests against a real OpenID provider (npm oidc-provider), marked e2e."""
