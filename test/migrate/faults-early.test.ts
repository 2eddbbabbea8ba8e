// The fault matrix's columns up to the freeze: a fault before any state has left the source.
import { faultMatrix } from '../support/fault-matrix.js';

faultMatrix(['checks', 'presync', 'precopy', 'freeze'], 'f', 78);
