// A real OpenID Connect provider (oidc-provider) for custody's tests, on loopback.
//
//   PORT=0 node server.js      -> prints {"issuer": "http://127.0.0.1:PORT"} on stdout when ready
//
// Clients:
//   ci-client / ci-secret      client_credentials; groups ["ci", "dba"]
//   ci-nogroups / ci-secret    client_credentials; no groups
//   ci-short / ci-secret       client_credentials; tokens live 2 seconds
//   ci-auditor / ci-secret     client_credentials; groups ["auditors"]
//   custody-cli                public native client: authorization code + PKCE, loopback redirect
// Users (dev interactions accept any password): alice -> groups ["dba"], anyone else -> [].
// Access tokens are RS256 JWTs for the requested resource (RFC 8707), default urn:custody.
import http from 'node:http';
import crypto from 'node:crypto';
import Provider from 'oidc-provider';

const GROUPS = { alice: ['dba'], 'ci-client': ['ci', 'dba'], 'ci-short': ['ci', 'dba'], 'ci-auditor': ['auditors'] };

function rsaKey() {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, kid: crypto.randomBytes(8).toString('hex'), use: 'sig', alg: 'RS256' };
}

const server = http.createServer();
await new Promise((resolve) => server.listen(Number(process.env.PORT || 0), '127.0.0.1', resolve));
const issuer = `http://127.0.0.1:${server.address().port}`;

const secret = process.env.CLIENT_SECRET || 'ci-secret';
const ccClient = (id) => ({
  client_id: id,
  client_secret: secret,
  grant_types: ['client_credentials'],
  response_types: [],
  redirect_uris: [],
  token_endpoint_auth_method: 'client_secret_post',
});

const provider = new Provider(issuer, {
  clients: [
    ccClient('ci-client'),
    ccClient('ci-nogroups'),
    ccClient('ci-short'),
    ccClient('ci-auditor'),
    {
      client_id: 'custody-cli',
      application_type: 'native',
      token_endpoint_auth_method: 'none',
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      redirect_uris: ['http://127.0.0.1/callback'],
    },
  ],
  jwks: { keys: [rsaKey()] },
  pkce: { required: () => true },
  features: {
    devInteractions: { enabled: true },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => 'urn:custody',
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resourceIndicator, client) => ({
        scope: 'openid email profile',
        audience: resourceIndicator,
        accessTokenFormat: 'jwt',
        accessTokenTTL: client.clientId === 'ci-short' ? 2 : 600,
        jwt: { sign: { alg: 'RS256' } },
      }),
    },
  },
  claims: { openid: ['sub'], email: ['email', 'email_verified'], profile: ['name'] },
  findAccount: async (ctx, id) => ({
    accountId: id,
    claims: async () => ({ sub: id, email: `${id}@example.test`, email_verified: true, name: id }),
  }),
  extraTokenClaims: async (ctx, token) => {
    const who = token.accountId || token.clientId;
    const out = { groups: GROUPS[who] || [] };
    if (token.accountId) out.email = `${token.accountId}@example.test`;
    return out;
  },
  ttl: {
    ClientCredentials: (ctx, token, client) => (client.clientId === 'ci-short' ? 2 : 600),
    AccessToken: 600,
    IdToken: 600,
    Interaction: 600,
    Session: 600,
    Grant: 600,
  },
});
provider.proxy = false;
server.on('request', provider.callback());
process.stdout.write(JSON.stringify({ issuer }) + '\n');
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => server.close(() => process.exit(0)));
