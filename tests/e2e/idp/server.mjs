// A real OpenID Connect provider (panva/oidc-provider) for the browser tests.
// Started by tests/e2e/conftest.py on loopback; prints "ready <issuer>" when listening.
//
// Environment: IDP_PORT, IDP_CLIENT_ID, IDP_CLIENT_SECRET, IDP_REDIRECT_URI,
// IDP_ACCOUNTS (JSON: {"<login>": {"roles": [...], "email": "..."}}).
// Logins use the provider's built-in development pages (any password).
import crypto from 'node:crypto';
import Provider from 'oidc-provider';

const port = Number(process.env.IDP_PORT);
const issuer = `http://127.0.0.1:${port}`;
const accounts = JSON.parse(process.env.IDP_ACCOUNTS || '{}');

// a fresh key with a random kid per start: relying parties cache JWKS by kid
const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const jwk = { ...privateKey.export({ format: 'jwk' }), kid: crypto.randomUUID(), alg: 'RS256', use: 'sig' };

const provider = new Provider(issuer, {
  clients: [{
    client_id: process.env.IDP_CLIENT_ID,
    client_secret: process.env.IDP_CLIENT_SECRET,
    redirect_uris: [process.env.IDP_REDIRECT_URI],
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  jwks: { keys: [jwk] },
  cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
  pkce: { required: () => true },
  scopes: ['openid', 'profile', 'email', 'roles'],
  claims: { openid: ['sub'], profile: ['name'], email: ['email'], roles: ['roles'] },
  conformIdTokenClaims: false,
  features: { devInteractions: { enabled: true }, userinfo: { enabled: true } },
  async findAccount(ctx, id) {
    const account = accounts[id] || { roles: [] };
    return {
      accountId: id,
      async claims() {
        return { sub: id, name: id, email: account.email || `${id}@example.org`, roles: account.roles || [] };
      },
    };
  },
});
provider.proxy = false;
const server = provider.listen(port, '127.0.0.1', () => {
  console.log(`ready ${issuer}`);
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
