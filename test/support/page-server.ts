// CRIU's page-server requests (criu/page-xfer.c): {u32 cmd, pad, u64 nr_pages, u64 vaddr, u64 dst_id}.

export const PS_IOV_GET = 7;
export const PS_IOV_CLOSE = 0x1023;

export function psRequest(cmd: number, n: number, vaddr: number, id: number): Buffer {
  const b = Buffer.alloc(32);
  b.writeUInt32LE(cmd, 0);
  b.writeBigUInt64LE(BigInt(n), 8);
  b.writeBigUInt64LE(BigInt(vaddr), 16);
  b.writeBigUInt64LE(BigInt(id), 24);
  return b;
}
