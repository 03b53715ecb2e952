// A real OpenID Connect provider (the certified `oidc-provider` package) for
// Portcullis's identity integration tests. Loopback only.
//
// Usage: node provider.mjs --port N [--ttl SECONDS] [--tls-cert PEM --tls-key PEM]
// (with a certificate it serves https, as a provider behind a private CA)
//
// What it offers, as any standard provider would:
// * discovery, JWKS, the device authorization grant (RFC 8628) with the
//   provider's own user-code pages, client credentials, refresh tokens
//   (scope offline_access), a `groups` claim in ID tokens and JWT access
//   tokens (resource indicator `urn:portcullis`);
// * a password-checked login page and a consent page (the interaction
//   routes below), which tests drive over HTTP as a browser would.
//
// Test-only endpoints (this process is never a production provider):
// * POST /__test/rotate: adds a new signing key in front of the old ones
//   (new tokens carry its `kid`); grants and refresh tokens survive.
// * POST /__test/sign {claims, mode}: signs arbitrary claims, to build the
//   tokens an attacker or a misconfigured provider would send: mode `rs256`
//   (the current private key), `none` (alg none), `hs256-public` (HS256 with
//   the public key as the HMAC secret).
//
// Prints `listening on http://127.0.0.1:N` once ready.

import { createServer } from 'node:http';
import { createServer as createTlsServer } from 'node:https';
import { readFileSync } from 'node:fs';
import { generateKeyPairSync, randomUUID, createPublicKey } from 'node:crypto';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';
import { SignJWT, importJWK } from 'jose';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string' },
    ttl: { type: 'string', default: '300' },
    'tls-cert': { type: 'string' },
    'tls-key': { type: 'string' },
  },
});
const port = Number(args.port);
const ttl = Number(args.ttl);
if (!Number.isInteger(port) || port <= 0 || !Number.isInteger(ttl) || ttl <= 0) {
  console.error('usage: node provider.mjs --port N [--ttl SECONDS] [--tls-cert PEM --tls-key PEM]');
  process.exit(2);
}
const tls = args['tls-cert'] && args['tls-key']
  ? { cert: readFileSync(args['tls-cert']), key: readFileSync(args['tls-key']) }
  : undefined;
const issuer = `${tls ? 'https' : 'http'}://127.0.0.1:${port}`;

// The people and their groups. Passwords are checked by the login page.
const USERS = {
  alice: {
    password: 'alice-pw', email: 'alice@example.test', name: 'Alice Example', groups: ['eng', 'db-admins'],
  },
  bob: {
    password: 'bob-pw', email: 'bob@example.test', name: 'Bob Example', groups: ['audit'],
  },
};

function newSigningKey() {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { ...privateKey.export({ format: 'jwk' }), kid: randomUUID(), alg: 'RS256', use: 'sig' };
}

let keys = [newSigningKey()];

// Provider state (grants, device codes, refresh tokens, sessions) in one
// map shared by every Provider instance this process creates, so that a key
// rotation (which builds a new instance) keeps logins and refresh tokens.
const store = new Map();

class SharedMemoryAdapter {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  async upsert(id, payload, expiresIn) {
    const expiresAt = expiresIn ? Date.now() + expiresIn * 1000 : Infinity;
    store.set(this.key(id), { payload, expiresAt });
    if (payload.grantId) {
      const grantKey = `grant:${payload.grantId}`;
      store.set(grantKey, [...(store.get(grantKey) ?? []), this.key(id)]);
    }
    if (payload.userCode) store.set(`userCode:${payload.userCode}`, id);
    if (payload.uid) store.set(`uid:${this.model}:${payload.uid}`, id);
  }

  async find(id) {
    const entry = store.get(this.key(id));
    if (!entry || entry.expiresAt <= Date.now()) return undefined;
    return entry.payload;
  }

  async findByUserCode(userCode) {
    const id = store.get(`userCode:${userCode}`);
    return id && this.find(id);
  }

  async findByUid(uid) {
    const id = store.get(`uid:${this.model}:${uid}`);
    return id && this.find(id);
  }

  async consume(id) {
    const entry = store.get(this.key(id));
    if (entry) entry.payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    store.delete(this.key(id));
  }

  async revokeByGrantId(grantId) {
    for (const key of store.get(`grant:${grantId}`) ?? []) store.delete(key);
    store.delete(`grant:${grantId}`);
  }
}

function configuration() {
  return {
    clients: [
      {
        // `portcullis login`: a public native client (device flow, refresh).
        client_id: 'portcullis',
        token_endpoint_auth_method: 'none',
        grant_types: ['urn:ietf:params:oauth:grant-type:device_code', 'refresh_token'],
        response_types: [],
        redirect_uris: [],
      },
      {
        // An automation account (client credentials).
        client_id: 'svc-reporting',
        client_secret: 'svc-reporting-secret',
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
      },
    ],
    jwks: { keys },
    adapter: SharedMemoryAdapter,
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      profile: ['name', 'preferred_username'],
      groups: ['groups'],
    },
    // Put the requested claims into the ID token itself: the gateway
    // verifies the ID token and never calls userinfo.
    conformIdTokenClaims: false,
    async findAccount(ctx, id) {
      const user = USERS[id];
      if (!user) return undefined;
      return {
        accountId: id,
        async claims() {
          return {
            sub: id,
            email: user.email,
            email_verified: true,
            name: user.name,
            preferred_username: id,
            groups: user.groups,
          };
        },
      };
    },
    features: {
      devInteractions: { enabled: false },
      deviceFlow: { enabled: true },
      clientCredentials: { enabled: true },
      revocation: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => undefined,
        useGrantedResource: () => true,
        getResourceServerInfo(ctx, resourceIndicator) {
          if (resourceIndicator !== 'urn:portcullis' && resourceIndicator !== 'urn:elsewhere') {
            throw new Error(`unknown resource ${resourceIndicator}`);
          }
          return {
            scope: 'db',
            audience: resourceIndicator,
            accessTokenTTL: ttl,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
    },
    async extraTokenClaims(ctx, token) {
      const user = token.accountId && USERS[token.accountId];
      return user ? { groups: user.groups } : undefined;
    },
    async issueRefreshToken(ctx, client, code) {
      return client.grantTypeAllowed('refresh_token') && code.scopes.has('offline_access');
    },
    ttl: {
      AccessToken: ttl,
      ClientCredentials: ttl,
      IdToken: ttl,
      DeviceCode: 600,
      RefreshToken: 3600,
      Grant: 3600,
      Interaction: 600,
      Session: 3600,
    },
    interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
    cookies: { keys: ['portcullis-test-cookie-key'] },
    pkce: { required: () => false },
  };
}

function newProvider() {
  const created = new Provider(issuer, configuration());
  created.on('grant.error', (ctx, error) => {
    console.error(`grant.error: ${error.message}: ${error.error_detail ?? ''}`);
  });
  created.on('refresh_token.destroyed', () => console.error('refresh_token.destroyed'));
  created.on('grant.revoked', () => console.error('grant.revoked'));
  return created;
}

let provider = newProvider();

function html(body) {
  return `<!DOCTYPE html><html><head><meta charset="utf-8"><title>Sign-in</title></head><body>${body}</body></html>`;
}

function escape(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

async function readForm(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

async function readJson(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return JSON.parse(Buffer.concat(chunks).toString('utf8') || '{}');
}

function send(res, status, type, body) {
  res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store' });
  res.end(body);
}

// The login and consent pages the provider redirects the browser to.
async function interaction(req, res, uid, action) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) throw new Error('interaction mismatch');
  const { prompt } = details;
  if (req.method === 'GET') {
    if (prompt.name === 'login') {
      return send(res, 200, 'text/html', html(
        `<h1>Sign-in</h1><form method="post" action="/interaction/${uid}/login">`
        + '<input type="text" name="login"/><input type="password" name="password"/>'
        + '<button type="submit">Sign-in</button></form>',
      ));
    }
    return send(res, 200, 'text/html', html(
      `<h1>Authorize ${escape(details.params.client_id)}</h1>`
      + `<form method="post" action="/interaction/${uid}/confirm">`
      + '<button type="submit">Continue</button></form>',
    ));
  }
  const form = await readForm(req);
  if (action === 'login') {
    const user = USERS[form.get('login')];
    if (!user || user.password !== form.get('password')) {
      return send(res, 200, 'text/html', html(
        `<p class="error">wrong login or password</p><form method="post" action="/interaction/${uid}/login">`
        + '<input type="text" name="login"/><input type="password" name="password"/>'
        + '<button type="submit">Sign-in</button></form>',
      ));
    }
    return provider.interactionFinished(req, res, { login: { accountId: form.get('login') } }, {
      mergeWithLastSubmission: false,
    });
  }
  if (action === 'confirm' && prompt.name === 'consent') {
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: details.session.accountId, clientId: details.params.client_id });
    if (prompt.details.missingOIDCScope) grant.addOIDCScope(prompt.details.missingOIDCScope.join(' '));
    if (prompt.details.missingOIDCClaims) grant.addOIDCClaims(prompt.details.missingOIDCClaims);
    if (prompt.details.missingResourceScopes) {
      for (const [indicator, scope] of Object.entries(prompt.details.missingResourceScopes)) {
        grant.addResourceScope(indicator, scope.join(' '));
      }
    }
    const grantId = await grant.save();
    return provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
  }
  return send(res, 400, 'text/plain', 'unexpected interaction step');
}

function b64url(value) {
  return Buffer.from(JSON.stringify(value)).toString('base64url');
}

// Signs `claims` as a test asks: a valid signature over wrong claims, or
// the classic forgeries a verifier must refuse.
async function sign({ claims, mode }) {
  const key = keys[0];
  switch (mode) {
    case 'rs256':
      return new SignJWT(claims)
        .setProtectedHeader({ alg: 'RS256', kid: key.kid, typ: 'JWT' })
        .sign(await importJWK(key, 'RS256'));
    case 'none':
      return `${b64url({ alg: 'none', typ: 'JWT' })}.${b64url(claims)}.`;
    case 'hs256-public': {
      const publicPem = createPublicKey({ key, format: 'jwk' }).export({ type: 'spki', format: 'pem' });
      return new SignJWT(claims)
        .setProtectedHeader({ alg: 'HS256', kid: key.kid, typ: 'JWT' })
        .sign(new TextEncoder().encode(publicPem));
    }
    default:
      throw new Error(`unknown mode ${mode}`);
  }
}

async function handle(req, res) {
  try {
    const url = new URL(req.url, issuer);
    const step = url.pathname.match(/^\/interaction\/([^/]+)(?:\/(login|confirm))?$/);
    if (step) {
      return await interaction(req, res, step[1], step[2]);
    }
    if (req.method === 'POST' && url.pathname === '/__test/rotate') {
      keys = [newSigningKey(), ...keys];
      provider = newProvider();
      return send(res, 200, 'application/json', JSON.stringify({ kid: keys[0].kid }));
    }
    if (req.method === 'POST' && url.pathname === '/__test/sign') {
      return send(res, 200, 'text/plain', await sign(await readJson(req)));
    }
    return provider.callback()(req, res);
  } catch (error) {
    console.error(error);
    if (!res.headersSent) send(res, 500, 'text/plain', String(error));
    return undefined;
  }
}

const server = tls ? createTlsServer(tls, handle) : createServer(handle);

server.listen(port, '127.0.0.1', () => {
  console.log(`listening on ${issuer}`);
});
