// Owned copy of the reference kit's server (DESIGN.md §4), changed to accept any loopback callback port.
// A real OAuth 2 / OpenID Connect authorization server for tests: oidc-provider 9 on loopback over HTTPS.
// Consent is approved without a person: the account that "logs in" is the login_hint of the
// authorization request, else the content of the file ./auto-user, else AUTO_USER, else alice.
import Provider from 'oidc-provider';
import https from 'node:https';
import fs from 'node:fs';

const PORT = Number(process.env.PORT || 14444);
const ISSUER = `https://127.0.0.1:${PORT}`;
const API = 'urn:credbroker:test-api';
const REDIRECTS = (process.env.OAUTH_REDIRECT_URIS || 'https://127.0.0.1:7444/oauth/callback').split(/\s+/).filter(Boolean);
const ttl = (name, dflt) => Number(process.env[name] || dflt);

const provider = new Provider(ISSUER, {
  clients: [{
    client_id: 'broker', client_secret: 'brokersecret',
    grant_types: ['authorization_code', 'refresh_token', 'client_credentials'],
    response_types: ['code'],
    redirect_uris: REDIRECTS,
    scope: 'openid email profile offline_access mail.send mail.read calendar',
  }],
  scopes: ['openid', 'email', 'profile', 'offline_access', 'mail.send', 'mail.read', 'calendar'],
  claims: { email: ['email', 'email_verified'], profile: ['name'] },
  pkce: { required: () => true },
  rotateRefreshToken: true,
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  ttl: {
    AccessToken: ttl('ACCESS_TTL', 60), ClientCredentials: ttl('ACCESS_TTL', 60),
    RefreshToken: ttl('REFRESH_TTL', 86400), Grant: 86400, Interaction: 600, Session: 86400,
  },
  cookies: { keys: ['peers-cookie-key-0123456789abcdef'] },
  findAccount: async (ctx, sub) => ({
    accountId: sub,
    claims: async () => ({ sub, email: `${sub}@x.test`, email_verified: true, name: sub }),
  }),
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    revocation: { enabled: true },
    introspection: { enabled: true },
    userinfo: { enabled: true },
    resourceIndicators: {
      enabled: true,
      // A request that names only OpenID scopes gets a token for userinfo; one that names an API
      // scope gets a token for the API (then the account is read from /me, like a provider's
      // identity endpoint that accepts API tokens).
      defaultResource: (ctx) => (/(^|\s)(mail\.|calendar)/.test(ctx.oidc.params.scope || '') ? API : undefined),
      useGrantedResource: () => true,
      getResourceServerInfo: () => ({ scope: 'mail.send mail.read calendar', accessTokenFormat: 'opaque' }),
    },
  },
});

// The broker under test listens on a random loopback port: accept its callback on any port.
const allowRedirect = provider.Client.prototype.redirectUriAllowed;
provider.Client.prototype.redirectUriAllowed = function redirectUriAllowed(uri) {
  try {
    const u = new URL(uri);
    if (u.protocol === 'https:' && ['127.0.0.1', 'localhost'].includes(u.hostname) && u.pathname === '/oauth/callback') return true;
  } catch { /* not a URL: let the provider refuse it */ }
  return allowRedirect.call(this, uri);
};

const autoUser = (params) => {
  if (params.login_hint) return String(params.login_hint);
  try { return fs.readFileSync('auto-user', 'utf8').trim() || 'alice'; } catch { return process.env.AUTO_USER || 'alice'; }
};

// GET /__stats: how many times each grant succeeded at the token endpoint, and revocations, so a
// test can prove e.g. that 200 concurrent resolves caused exactly one refresh.
const stats = { authorization_code: 0, refresh_token: 0, client_credentials: 0, revocation: 0, token_errors: 0 };
provider.on('grant.success', (ctx) => { const g = ctx.oidc.params.grant_type; stats[g] = (stats[g] || 0) + 1; });
provider.on('grant.error', () => { stats.token_errors += 1; });
provider.use(async (ctx, next) => {
  if (ctx.path === '/__stats' && ctx.method === 'GET') { ctx.body = stats; return; }
  await next();
  if (ctx.path === '/token/revocation' && ctx.status === 200) stats.revocation += 1;
});

// POST /__revoke_grant?token=AT: revokes the whole grant behind an access token, as a user does
// from the provider's "connected apps" page; the next refresh then fails with invalid_grant.
provider.use(async (ctx, next) => {
  if (ctx.path !== '/__revoke_grant' || ctx.method !== 'POST') return next();
  const at = await provider.AccessToken.find(String(ctx.query.token || ''));
  if (!at) { ctx.status = 404; ctx.body = { error: 'unknown token' }; return; }
  const grant = await provider.Grant.find(at.grantId);
  if (grant) await grant.destroy();
  for (const model of [provider.AccessToken, provider.RefreshToken, provider.AuthorizationCode]) {
    await model.adapter.revokeByGrantId(at.grantId);
  }
  ctx.body = { revoked: true };
});

// GET /me with an access token for the API: the account behind it ({sub, email, name}), as a
// provider's identity endpoint (Google's userinfo, Slack's auth.test) answers for its API tokens.
provider.use(async (ctx, next) => {
  if (ctx.path !== '/me' || ctx.method !== 'GET') return next();
  const m = (ctx.get('authorization') || '').match(/^Bearer (.+)$/);
  const at = m && await provider.AccessToken.find(m[1]);
  if (!at || at.isExpired) { ctx.status = 401; ctx.body = { error: 'invalid_token' }; return; }
  ctx.body = { sub: at.accountId, email: `${at.accountId}@x.test`, name: at.accountId };
});

provider.use(async (ctx, next) => {
  const m = ctx.path.match(/^\/interaction\/([^/]+)$/);
  if (!m || ctx.method !== 'GET') return next();
  const d = await provider.interactionDetails(ctx.req, ctx.res);
  let result;
  if (d.prompt.name === 'login') {
    result = { login: { accountId: autoUser(d.params) } };
  } else {
    const grant = d.grantId ? await provider.Grant.find(d.grantId)
      : new provider.Grant({ accountId: d.session.accountId, clientId: d.params.client_id });
    const det = d.prompt.details;
    if (det.missingOIDCScope) grant.addOIDCScope(det.missingOIDCScope.join(' '));
    if (det.missingOIDCClaims) grant.addOIDCClaims(det.missingOIDCClaims);
    for (const [ind, sc] of Object.entries(det.missingResourceScopes || {})) grant.addResourceScope(ind, sc.join(' '));
    result = { consent: { grantId: await grant.save() } };
  }
  ctx.redirect(await provider.interactionResult(ctx.req, ctx.res, result, { mergeWithLastSubmission: false }));
});

const tls = { cert: fs.readFileSync(process.env.TLS_CERT), key: fs.readFileSync(process.env.TLS_KEY) };
https.createServer(tls, provider.callback()).listen(PORT, '127.0.0.1', () => console.log(`oidc-provider listening ${ISSUER}`));
