// Who is at the other end of a TLS connection, and what that peer may do. A certificate carries
// one role in its subject's OU:
//   agent    — a host's agent: sends and receives migrations
//   operator — runs, stops, checkpoints and migrates tasks; reads everything a reader reads
//   reader   — lists tasks, reads logs and history
//   controller — the cluster's controller: serves the cluster API, and operates agents like an operator
import type { PeerCertificate } from 'node:tls';

export const ROLES = ['agent', 'operator', 'reader', 'controller'] as const;
export type Role = (typeof ROLES)[number];

/** What an endpoint needs. */
export type Permission = 'info' | 'read' | 'operate' | 'migrate-in';

const GRANTS: Record<Role, readonly Permission[]> = {
  agent: ['info', 'migrate-in'],
  operator: ['info', 'read', 'operate'],
  reader: ['info', 'read'],
  controller: ['info', 'read', 'operate'],
};

export interface PeerIdentity {
  name: string;
  role: Role;
  serial: string;
  /** Extended key usages the certificate allows. */
  server: boolean;
  client: boolean;
}

const SERVER_AUTH = '1.3.6.1.5.5.7.3.1';
const CLIENT_AUTH = '1.3.6.1.5.5.7.3.2';

/** The identity in a verified peer certificate, or why it has none Ferry accepts. */
export function identify(cert: PeerCertificate | undefined): PeerIdentity | string {
  if (!cert || !cert.subject) return 'no certificate';
  const name = one(cert.subject.CN);
  const ou = one(cert.subject.OU);
  if (!name) return 'the certificate names no host or user (CN)';
  if (!ou || !(ROLES as readonly string[]).includes(ou)) return `the certificate of '${name}' carries no Ferry role (issue it again with \`ferry cert issue ${name} --role ROLE\`)`;
  const eku = (cert as PeerCertificate & { ext_key_usage?: string[] }).ext_key_usage ?? [];
  return { name, role: ou as Role, serial: cert.serialNumber ?? '', server: eku.includes(SERVER_AUTH), client: eku.includes(CLIENT_AUTH) };
}

export function allows(role: Role, need: Permission): boolean {
  return GRANTS[role].includes(need);
}

function one(v: string | string[] | undefined): string | undefined {
  return Array.isArray(v) ? (v.length === 1 ? v[0] : undefined) : v;
}
