// A real OpenID Provider (oidc-provider) for the approval and just-in-time credential tests.
//
//   node op.mjs SETUP.json
//
// SETUP.json (written by tests/support/op.py) holds the port (0: any free one), the OP's signing key, its
// clients, accounts, resource servers and the issuers whose tokens the token exchange accepts. Once listening
// the script prints one JSON line on stdout: {"port": N, "issuer": "http://127.0.0.1:N"}.
//
// What oidc-provider does as shipped, and what this script adds:
// - CIBA poll mode (built in): `login_hint` names an account of SETUP.accounts. Nobody is notified: the test plays
//   the person through the control endpoints below (`provider.backchannelResult`).
// - `interval` in the backchannel answer (oidc-provider leaves it out, and a client then waits CIBA's default
//   5 s between polls): SETUP.ciba_interval seconds, changeable through /_test/config.
// - A store that never forgets: the in-memory adapter drops a CIBA request when it expires, so the poll says
//   `invalid_grant` (not found) rather than `expired_token`. Here everything stays until the process ends.
// - Client credentials with resource indicators (built in; the resource servers come from SETUP).
// - RFC 8693 token exchange, registered with `registerGrantType`: the `subject_token` is a JWT from a trusted
//   issuer (SETUP.subject_issuers) or an access token this OP issued; `audience`/`resource` must name a resource
//   server the client may use, `scope` must be within what the client may have there (never wider); the issued
//   JWT names the client (the PEP) in `act`, nesting the subject token's own `act`.
// - Control endpoints under /_test/ (JSON in, JSON out), never faulted:
//     GET  /_test/ciba                       the backchannel requests seen, newest last
//     POST /_test/ciba/ID/approve            the person approves (a grant for the request's scopes)
//     POST /_test/ciba/ID/deny               the person declines (access_denied)
//     POST /_test/ciba/ID/expire             the request expires now
//     POST /_test/fault                      {mode, path?, count?, status?, delay_ms?, error?, body?}; mode
//                                            none | status | malformed | delay | close | oauth_error
//     POST /_test/config                     {ciba_interval?}
//     GET  /_test/stats                      requests per path and token requests per grant type
// Stopping (SIGTERM) and freezing (SIGSTOP) are done by the test, by PID.

import http from 'node:http';
import { readFileSync } from 'node:fs';
import { randomUUID } from 'node:crypto';

import Provider, { errors } from 'oidc-provider';
import { SignJWT, createLocalJWKSet, importJWK, jwtVerify, decodeProtectedHeader } from 'jose';

const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const JWT_TYPE = 'urn:ietf:params:oauth:token-type:jwt';
const ACCESS_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:access_token';

const setup = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const state = { interval: setup.ciba_interval ?? 1, fault: null, cibaSeen: [], stats: { paths: {}, grants: {} } };

// ---- the store: oidc-provider's adapter interface over a Map that forgets nothing ----------------------------
const store = new Map();
const grantIndex = new Map(); // grantId -> keys of the tokens issued under it (revocation)

class KeepingAdapter {
  constructor(model) { this.model = model; }
  key(id) { return `${this.model}:${id}`; }
  async upsert(id, payload) {
    store.set(this.key(id), payload);
    if (payload.grantId) {
      if (!grantIndex.has(payload.grantId)) grantIndex.set(payload.grantId, new Set());
      grantIndex.get(payload.grantId).add(this.key(id));
    }
    if (this.model === 'Session' && payload.uid) store.set(`sessionUid:${payload.uid}`, id);
    if (payload.userCode) store.set(`userCode:${payload.userCode}`, id);
  }
  async find(id) { return store.get(this.key(id)); }
  async findByUid(uid) { return this.find(store.get(`sessionUid:${uid}`)); }
  async findByUserCode(code) { return this.find(store.get(`userCode:${code}`)); }
  async consume(id) { const p = store.get(this.key(id)); if (p) p.consumed = Math.floor(Date.now() / 1000); }
  async destroy(id) { store.delete(this.key(id)); }
  async revokeByGrantId(grantId) {
    for (const key of grantIndex.get(grantId) ?? []) store.delete(key);
    grantIndex.delete(grantId);
  }
}

// ---- resource servers and what each client may ask for there -------------------------------------------------
// setup.resources: {indicator: {audience, scope: "a b", ttl}}; setup.clients[i].resources: {indicator: "a b"}
const clientPolicy = new Map(setup.clients.map((c) => [c.client_id, c.resources ?? {}]));

function resourceFor(value) {
  if (setup.resources[value]) return [value, setup.resources[value]];
  for (const [indicator, rs] of Object.entries(setup.resources)) if (rs.audience === value) return [indicator, rs];
  return [undefined, undefined];
}

async function getResourceServerInfo(ctx, indicator, client) {
  const allowed = clientPolicy.get(client.clientId)?.[indicator];
  const rs = setup.resources[indicator];
  if (!rs || allowed === undefined) throw new errors.InvalidTarget('resource not allowed for this client');
  return {
    scope: allowed,
    audience: rs.audience ?? indicator,
    accessTokenTTL: rs.ttl ?? 300,
    accessTokenFormat: 'jwt',
    jwt: { sign: { alg: 'ES256' } },
  };
}

// ---- the provider --------------------------------------------------------------------------------------------
const server = http.createServer();
await new Promise((resolve) => server.listen(setup.port ?? 0, '127.0.0.1', resolve));
const { port } = server.address();
const issuer = `http://127.0.0.1:${port}`;

const accounts = setup.accounts; // login_hint -> account id (its email claim is ID@example.com)
const accountIds = new Set(Object.values(accounts));

const provider = new Provider(issuer, {
  adapter: KeepingAdapter,
  jwks: { keys: [setup.signing_key] },
  clients: setup.clients.map(({ resources, ...metadata }) => metadata),
  findAccount: async (ctx, id) => (accountIds.has(id)
    ? { accountId: id, claims: async () => ({ sub: id, email: `${id}@example.com` }) }
    : undefined),
  claims: { openid: ['sub'], email: ['email'] },
  conformIdTokenClaims: false, // the ID token of a CIBA grant carries the claims of its scopes (email)
  scopes: ['openid', 'email', 'offline_access', ...(setup.scopes ?? [])],
  clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'private_key_jwt'],
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: async () => undefined,
      useGrantedResource: async () => true,
      getResourceServerInfo,
    },
    ciba: {
      enabled: true,
      deliveryModes: ['poll'],
      processLoginHint: async (ctx, hint) => accounts[hint],
      processLoginHintToken: async () => undefined,
      verifyUserCode: async () => undefined,
      validateRequestContext: async () => undefined,
      // CIBA asks for a short plain-text message; this OP takes up to 100 printable ASCII characters.
      validateBindingMessage: async (ctx, message) => {
        if (message !== undefined && !/^[\x20-\x7e]{1,100}$/.test(message)) {
          throw new errors.InvalidBindingMessage('binding_message must be 1-100 printable ASCII characters');
        }
      },
      triggerAuthenticationDevice: async (ctx, request, account, client) => {
        state.cibaSeen.push({
          auth_req_id: request.jti,
          account: account.accountId,
          client_id: client.clientId,
          binding_message: request.params.binding_message ?? null,
          login_hint: request.params.login_hint ?? null,
          scope: request.scope,
          requested_expiry: request.params.requested_expiry ?? null,
          expires_in: request.expiration,
        });
      },
    },
  },
  ttl: {
    BackchannelAuthenticationRequest: (ctx) => Math.min(600, +(ctx?.oidc?.params.requested_expiry ?? 600)),
    AccessToken: () => setup.access_token_ttl ?? 300,
    IdToken: () => 300,
    ClientCredentials: (ctx, token) => token.resourceServer?.accessTokenTTL ?? 300,
    Grant: () => 600,
  },
  pkce: { required: () => false },
});

// ---- RFC 8693 token exchange -----------------------------------------------------------------------------------
const subjectIssuers = new Map(
  Object.entries(setup.subject_issuers ?? {}).map(([iss, jwks]) => [iss, createLocalJWKSet(jwks)]),
);
const signingKey = await importJWK(setup.signing_key, 'ES256');

async function verifiedSubject(ctx, token, type) {
  if (type === JWT_TYPE || (type === ACCESS_TOKEN_TYPE && token.split('.').length === 3)) {
    let header;
    let claims;
    try {
      header = decodeProtectedHeader(token);
      claims = JSON.parse(Buffer.from(token.split('.')[1], 'base64url').toString('utf8'));
    } catch {
      throw new errors.InvalidGrant('subject_token is not a JWT');
    }
    if (claims.iss === issuer) {
      const { payload } = await jwtVerify(token, createLocalJWKSet({ keys: [publicOf(setup.signing_key)] }), {
        issuer,
      }).catch(() => { throw new errors.InvalidGrant('subject_token does not verify'); });
      return payload;
    }
    const keys = subjectIssuers.get(claims.iss);
    if (!keys || !header.alg) throw new errors.InvalidGrant('subject_token is from an untrusted issuer');
    const { payload } = await jwtVerify(token, keys, { issuer: claims.iss }).catch(() => {
      throw new errors.InvalidGrant('subject_token does not verify (signature, exp or nbf)');
    });
    return payload;
  }
  if (type === ACCESS_TOKEN_TYPE) {
    const at = await provider.AccessToken.find(token);
    if (!at || at.isExpired) throw new errors.InvalidGrant('subject_token is not an active access token');
    return { sub: at.accountId, client_id: at.clientId };
  }
  throw new errors.InvalidRequest('unsupported subject_token_type');
}

function publicOf(jwk) {
  const { d, ...pub } = jwk;
  return pub;
}

async function tokenExchange(ctx) {
  const { client } = ctx.oidc;
  const params = ctx.oidc.params;
  if (!params.subject_token || !params.subject_token_type) {
    throw new errors.InvalidRequest('subject_token and subject_token_type are required');
  }
  const subject = await verifiedSubject(ctx, params.subject_token, params.subject_token_type);
  if (typeof subject.sub !== 'string' || !subject.sub) throw new errors.InvalidGrant('subject_token has no sub');
  let actor;
  if (params.actor_token) {
    actor = await verifiedSubject(ctx, params.actor_token, params.actor_token_type ?? JWT_TYPE);
  }
  const targets = [].concat(params.resource ?? [], params.audience ?? []);
  if (targets.length !== 1) throw new errors.InvalidTarget('exactly one audience or resource is required');
  const [indicator, rs] = resourceFor(targets[0]);
  const allowed = indicator === undefined ? undefined : clientPolicy.get(client.clientId)?.[indicator];
  if (allowed === undefined) throw new errors.InvalidTarget('audience not allowed for this client');
  const allowedSet = new Set(allowed.split(' ').filter(Boolean));
  const requested = (params.scope ?? '').split(' ').filter(Boolean);
  for (const s of requested) {
    if (!allowedSet.has(s)) throw new errors.InvalidScope('scope wider than this client may have', s);
  }
  const scope = (requested.length ? requested : [...allowedSet]).join(' ');
  const ttl = rs.ttl ?? 300;
  const act = { sub: actor?.sub ?? client.clientId, ...(subject.act ? { act: subject.act } : {}) };
  const now = Math.floor(Date.now() / 1000);
  const token = await new SignJWT({ scope, client_id: client.clientId, act })
    .setProtectedHeader({ alg: 'ES256', kid: setup.signing_key.kid, typ: 'at+jwt' })
    .setIssuer(issuer)
    .setSubject(subject.sub)
    .setAudience(rs.audience ?? indicator)
    .setIssuedAt(now)
    .setExpirationTime(now + ttl)
    .setJti(randomUUID())
    .sign(signingKey);
  ctx.body = {
    access_token: token,
    issued_token_type: ACCESS_TOKEN_TYPE,
    token_type: 'Bearer',
    expires_in: ttl,
    scope,
  };
}

provider.registerGrantType(
  TOKEN_EXCHANGE,
  tokenExchange,
  ['audience', 'resource', 'scope', 'requested_token_type', 'subject_token', 'subject_token_type', 'actor_token',
    'actor_token_type'],
  ['audience', 'resource'],
);

// `interval` in the backchannel answer.
provider.use(async (ctx, next) => {
  await next();
  if (ctx.path === '/backchannel' && ctx.status === 200 && ctx.body && ctx.body.auth_req_id) {
    ctx.body = { ...ctx.body, interval: state.interval };
  }
});

// ---- control endpoints and fault injection -------------------------------------------------------------------
function json(res, status, body) {
  const data = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(data) });
  res.end(data);
}

async function readJson(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  const text = Buffer.concat(chunks).toString('utf8');
  return text ? JSON.parse(text) : {};
}

async function cibaRequest(id) {
  const request = await provider.BackchannelAuthenticationRequest.find(id, { ignoreExpiration: true });
  if (!request) throw Object.assign(new Error('no such backchannel request'), { status: 404 });
  return request;
}

async function control(req, res, url) {
  const parts = url.pathname.split('/').filter(Boolean); // ['_test', ...]
  if (req.method === 'GET' && parts[1] === 'ciba' && parts.length === 2) return json(res, 200, state.cibaSeen);
  if (req.method === 'GET' && parts[1] === 'stats') return json(res, 200, state.stats);
  if (req.method === 'POST' && parts[1] === 'fault') {
    const fault = await readJson(req);
    state.fault = fault.mode === 'none' ? null : { count: -1, ...fault };
    return json(res, 200, { fault: state.fault });
  }
  if (req.method === 'POST' && parts[1] === 'config') {
    const body = await readJson(req);
    if (body.ciba_interval !== undefined) state.interval = body.ciba_interval;
    return json(res, 200, { ciba_interval: state.interval });
  }
  if (req.method === 'POST' && parts[1] === 'ciba' && parts.length === 4) {
    const request = await cibaRequest(parts[2]);
    if (parts[3] === 'approve') {
      const grant = new provider.Grant({ accountId: request.accountId, clientId: request.clientId });
      grant.addOIDCScope(request.scope);
      if (request.resource) {
        for (const r of [].concat(request.resource)) grant.addResourceScope(r, request.scope);
      }
      await grant.save();
      await provider.backchannelResult(request, grant, { authTime: Math.floor(Date.now() / 1000) });
      return json(res, 200, { approved: request.jti, account: request.accountId });
    }
    if (parts[3] === 'deny') {
      await provider.backchannelResult(request, new errors.AccessDenied('the person declined'));
      return json(res, 200, { denied: request.jti });
    }
    if (parts[3] === 'expire') {
      request.exp = Math.floor(Date.now() / 1000) - 1;
      await request.save(1);
      return json(res, 200, { expired: request.jti });
    }
  }
  return json(res, 404, { error: 'unknown control endpoint' });
}

function grantTypeOf(req, body) {
  return new URLSearchParams(body.toString('latin1')).get('grant_type') ?? 'none';
}

const callback = provider.callback();

async function faulted(req, res, fault) {
  if (fault.count > 0) fault.count -= 1;
  if (fault.count === 0) state.fault = null;
  switch (fault.mode) {
    case 'status':
      res.writeHead(fault.status ?? 503, { 'content-type': 'text/plain' });
      res.end(fault.body ?? 'unavailable');
      return true;
    case 'malformed':
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(fault.body ?? '{"access_token": "abc", "token_type": ');
      return true;
    case 'oauth_error':
      json(res, 400, { error: fault.error ?? 'server_error' });
      return true;
    case 'close':
      req.socket.destroy();
      return true;
    case 'delay':
      await new Promise((resolve) => setTimeout(resolve, fault.delay_ms ?? 1000));
      return false;
    default:
      return false;
  }
}

server.on('request', async (req, res) => {
  const url = new URL(req.url, issuer);
  try {
    if (url.pathname.startsWith('/_test/')) {
      await control(req, res, url);
      return;
    }
    state.stats.paths[url.pathname] = (state.stats.paths[url.pathname] ?? 0) + 1;
    // The body is read here (for the statistics and the faults) and handed to oidc-provider as pre-parsed.
    const chunks = [];
    for await (const chunk of req) chunks.push(chunk);
    const body = Buffer.concat(chunks);
    if (url.pathname === '/token') {
      const gty = grantTypeOf(req, body);
      state.stats.grants[gty] = (state.stats.grants[gty] ?? 0) + 1;
    }
    const fault = state.fault;
    if (fault && (!fault.path || fault.path === url.pathname) && (await faulted(req, res, fault))) return;
    req.body = body.toString('utf8'); // oidc-provider parses a string body itself (once the stream is read)
    callback(req, res);
  } catch (err) {
    if (!res.headersSent) json(res, err.status ?? 500, { error: 'test_op_error', error_description: String(err) });
  }
});

process.on('SIGTERM', () => {
  server.close();
  server.closeAllConnections();
  process.exit(0);
});

process.stdout.write(`${JSON.stringify({ port, issuer })}\n`);
