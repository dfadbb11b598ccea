// A stand-in for Okta in the end-to-end tests, on loopback only.
//
// oidc-provider (an OpenID Certified implementation nobody on this team wrote)
// shaped like an Okta custom authorization server, so the tests walk the same
// steps as a user of the reference article:
//
//   issuer     http://127.0.0.1:PORT/oauth2/default
//   discovery  /oauth2/default/.well-known/openid-configuration
//   authorize  /oauth2/default/v1/authorize     token  /oauth2/default/v1/token
//   JWKS       /oauth2/default/v1/keys          login  /oauth2/default/login/UID
//
// Usage: node provider.mjs CONFIG.json
//
// CONFIG.json (written by tests/e2e/conftest.py for every start):
//   port         TCP port on 127.0.0.1 (kept across restarts: the issuer URL is fixed)
//   keys         private JWK Set; every key is published, the FIRST one signs,
//                so a restart with [new, old] and then [new] is a key rotation
//   clients      oidc-provider client metadata (the native PKCE app and others)
//   users_file   path of the users file, re-read at every login and token
//                exchange, so a test "disables a user in Okta" by rewriting it:
//                {"alice": {"sub": "00u...", "password": "...", "groups": [...],
//                           "disabled": false, "id_token_ttl": 3600}}
//   jwks_max_age optional Cache-Control max-age of the JWKS response (Okta sends one)
//   id_token_introspection
//                optional, true: answer RFC 7662 introspection of ID tokens the
//                way Okta does (see below); false: oidc-provider's own answer
//
// Introspection and revocation (RFC 7662, RFC 7009) are oidc-provider's own,
// at /v1/introspect and /v1/revoke, with its client authentication. It
// introspects only the tokens it stores (opaque access tokens, refresh
// tokens): an ID token, which it never stores, is always "active": false.
// Okta's endpoint takes ID tokens (token_type_hint=id_token); we expect it to
// report a deactivated user's tokens inactive (not checked against a real
// org), and with id_token_introspection that one
// refusal is rewritten after oidc-provider authenticated the client: the ID token is verified with oidc-provider's own keys and is
// active while unexpired and its user exists and is not disabled.
//
// Once listening it prints one JSON line {"event": "listening", ...} on stdout.
// The login page is a minimal HTML form (username + password), then a consent
// form; a refused sign-in answers 401 with the form again, like Okta's page.
// Nothing here is for production: in-memory storage, no TLS, test users.

import { randomBytes, timingSafeEqual } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import process from 'node:process';

import Provider from 'oidc-provider';

const PREFIX = '/oauth2/default';
const LOGIN = `${PREFIX}/login/`;
const HOST = '127.0.0.1';

const configPath = process.argv[2];
if (!configPath) {
  process.stderr.write('usage: node provider.mjs CONFIG.json\n');
  process.exit(2);
}
const config = JSON.parse(readFileSync(configPath, 'utf8'));
const issuer = `http://${HOST}:${config.port}${PREFIX}`;

function readUsers() {
  return JSON.parse(readFileSync(config.users_file, 'utf8'));
}

function userBySub(sub) {
  return Object.values(readUsers()).find((u) => u.sub === sub);
}

function sameText(a, b) {
  const x = Buffer.from(String(a));
  const y = Buffer.from(String(b));
  return x.length === y.length && timingSafeEqual(x, y);
}

const provider = new Provider(issuer, {
  clients: config.clients,
  jwks: config.keys,
  cookies: { keys: [randomBytes(32).toString('base64url')] },
  // Okta's "groups" claim set to "Include in: ID Token, Always, any scope".
  claims: {
    openid: ['sub', 'groups'],
    profile: ['name', 'preferred_username'],
  },
  scopes: ['openid', 'profile', 'offline_access'],
  conformIdTokenClaims: false,
  features: {
    devInteractions: { enabled: false },
    introspection: { enabled: true },
    revocation: { enabled: true },
  },
  pkce: { required: () => true },
  // A disabled or deleted user has no account: the code exchange then fails
  // with invalid_grant, as Okta refuses tokens for a deactivated user.
  async findAccount(ctx, sub) {
    const user = userBySub(sub);
    if (!user || user.disabled) {
      return undefined;
    }
    return {
      accountId: sub,
      async claims() {
        return { sub, groups: user.groups, name: user.name, preferred_username: user.email };
      },
    };
  },
  interactions: {
    url: (ctx, interaction) => `${LOGIN}${interaction.uid}`,
  },
  routes: {
    authorization: '/v1/authorize',
    token: '/v1/token',
    jwks: '/v1/keys',
    userinfo: '/v1/userinfo',
    end_session: '/v1/logout',
    revocation: '/v1/revoke',
    introspection: '/v1/introspect',
  },
  ttl: {
    AccessToken: 3600,
    AuthorizationCode: 60,
    // Okta's ID tokens live one hour; a user may carry a shorter test lifetime.
    IdToken: (ctx, token) => userBySub(token.available.sub)?.id_token_ttl ?? 3600,
    Interaction: 600,
    Session: 3600,
    Grant: 3600,
    RefreshToken: 86400,
  },
  renderError(ctx, out) {
    ctx.type = 'json';
    ctx.body = out;
  },
});

if (config.jwks_max_age !== undefined && config.jwks_max_age !== null) {
  provider.use(async (ctx, next) => {
    await next();
    if (ctx.oidc?.route === 'jwks') {
      ctx.set('Cache-Control', `max-age=${config.jwks_max_age}`);
    }
  });
}

async function introspectIdToken(token) {
  const inactive = { active: false };
  let payload;
  try {
    const { aud } = JSON.parse(Buffer.from(String(token).split('.')[1], 'base64url'));
    const client = await provider.Client.find(Array.isArray(aud) ? aud[0] : aud);
    if (!client) {
      return inactive;
    }
    ({ payload } = await provider.IdToken.validate(token, client));
  } catch {
    return inactive;
  }
  const user = userBySub(payload.sub);
  if (payload.exp <= Date.now() / 1000 || !user || user.disabled) {
    return inactive;
  }
  return {
    active: true,
    token_type: 'id_token',
    sub: payload.sub,
    iss: provider.issuer,
    aud: payload.aud,
    exp: payload.exp,
    iat: payload.iat,
  };
}

if (config.id_token_introspection) {
  // oidc-provider refuses every JWT at its introspection endpoint (400
  // unsupported_token_type, after authenticating the client); for an ID
  // token from an authenticated client, answer as Okta does instead.
  provider.use(async (ctx, next) => {
    await next();
    if (
      ctx.oidc?.route === 'introspection'
      && ctx.oidc.client
      && ctx.status === 400
      && ctx.body?.error === 'unsupported_token_type'
      && ctx.oidc.params?.token_type_hint === 'id_token'
    ) {
      ctx.status = 200;
      ctx.body = await introspectIdToken(ctx.oidc.params.token);
    }
  });
}

const escape = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function page(res, status, title, body) {
  res.statusCode = status;
  res.setHeader('Content-Type', 'text/html; charset=utf-8');
  res.setHeader('Cache-Control', 'no-store');
  res.end(`<!DOCTYPE html><html><head><title>${escape(title)}</title></head><body>${body}</body></html>`);
}

function loginForm(uid, error) {
  const note = error ? `<p class="error">${escape(error)}</p>` : '';
  return `<h1>Sign In</h1>${note}
<form method="post" action="${LOGIN}${escape(uid)}">
<input type="hidden" name="step" value="login">
<label>Username <input name="username"></label>
<label>Password <input name="password" type="password"></label>
<button type="submit">Sign In</button></form>`;
}

function consentForm(uid, clientId, scopes) {
  return `<h1>Allow access</h1><p>${escape(clientId)} asks for: ${escape(scopes.join(' '))}</p>
<form method="post" action="${LOGIN}${escape(uid)}">
<input type="hidden" name="step" value="consent">
<button type="submit">Allow</button></form>`;
}

async function readForm(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 64 * 1024) {
      throw new Error('form too large');
    }
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

async function interaction(req, res) {
  const details = await provider.interactionDetails(req, res);
  const { uid, prompt, params, session } = details;
  if (req.method === 'GET') {
    if (prompt.name === 'login') {
      return page(res, 200, 'Sign In', loginForm(uid));
    }
    const scopes = prompt.details.missingOIDCScope ?? [];
    return page(res, 200, 'Allow access', consentForm(uid, params.client_id, scopes));
  }
  if (req.method !== 'POST') {
    return page(res, 405, 'Method not allowed', '<p>method not allowed</p>');
  }
  const form = await readForm(req);
  const step = form.get('step');
  if (step === 'login' && prompt.name === 'login') {
    const user = readUsers()[form.get('username') ?? ''];
    if (!user || user.disabled || !sameText(user.password, form.get('password') ?? '')) {
      return page(res, 401, 'Sign In', loginForm(uid, 'Unable to sign in'));
    }
    return provider.interactionFinished(req, res, { login: { accountId: user.sub } }, {
      mergeWithLastSubmission: false,
    });
  }
  if (step === 'consent' && prompt.name === 'consent') {
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    if (prompt.details.missingOIDCScope) {
      grant.addOIDCScope(prompt.details.missingOIDCScope.join(' '));
    }
    if (prompt.details.missingOIDCClaims) {
      grant.addOIDCClaims(prompt.details.missingOIDCClaims);
    }
    const grantId = await grant.save();
    return provider.interactionFinished(req, res, { consent: { grantId } }, {
      mergeWithLastSubmission: true,
    });
  }
  return page(res, 400, 'Bad request', `<p>unexpected step for prompt ${escape(prompt.name)}</p>`);
}

const handle = provider.callback();

const server = http.createServer((req, res) => {
  const path = req.url.split('?', 1)[0];
  if (path.startsWith(LOGIN)) {
    interaction(req, res).catch((err) => {
      process.stderr.write(`interaction failed: ${err}\n`);
      if (!res.headersSent) {
        page(res, 400, 'Sign-in error', `<p>${escape(err.message)}</p>`);
      } else {
        res.end();
      }
    });
    return;
  }
  if (path === PREFIX || path.startsWith(`${PREFIX}/`)) {
    // Mount oidc-provider under the authorization server's path, as Okta's
    // custom authorization servers are: it derives its URLs from originalUrl.
    req.originalUrl = req.url;
    req.baseUrl = PREFIX;
    req.url = req.url.slice(PREFIX.length) || '/';
    handle(req, res);
    return;
  }
  res.statusCode = 404;
  res.end();
});

function stop() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);

server.listen(config.port, HOST, () => {
  const kids = config.keys.keys.map((k) => k.kid);
  process.stdout.write(`${JSON.stringify({ event: 'listening', issuer, port: server.address().port, kids })}\n`);
});
